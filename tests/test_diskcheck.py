"""The guest's disk checker without a guest: the lab's parsers and record format, and
``cpx diskcheck`` itself built for this host and run on files in a temporary directory.

No root: ``cpx`` (guest/cpx.c) is compiled with the host's gcc, as guest/build.sh does for
the guest. The checker reads its file back with O_DIRECT where the file system allows it
and drops the cached pages where it does not (tmpfs); both paths verify the same records.
The QEMU test (tests/test_guest_disk.py) runs the same program in the guest on a real disk.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from coloproxy.lab.diskcheck import (
    ACKED_MAGIC,
    DISKCHECK_MAGIC,
    RECORD_SIZE,
    DiskcheckLine,
    DiskVerify,
    diskcheck_lines,
    diskcheck_summary,
    parse_acked,
    parse_verified,
    record,
)
from coloproxy.lab.qemu import guest_cmdline, repo_root
from coloproxy.lab.vms import LabError

# -- the console lines -------------------------------------------------------------------------

CONSOLE = (
    b"coloproxy-guest: booting 6.1.0\r\n"
    b"coloproxy-guest: disk /dev/vda mounted at /data\r\n"
    b"diskcheck: start file=/data/diskcheck.dat bytes=0 capacity=16384 resuming after record 0"
    b" verified=0 errors=0\r\n"
    b"memcheck seq=1 steps=10 writes=100 passes=0 errors=0 sum=00\r\n"
    b"diskcheck seq=511 records=511 verified=4111 errors=0\r\n"
    b"tcpstat retrans=0\r\n"
    b"diskcheck seq=1023 records=1023 verified=8817 errors=0\r\n"
    b"diskcheck: error: record 20 (slot 19) bad: not a good record\r\n"
    b"diskcheck seq=1535 records=1535 verified=13601 errors=1\r\n"
)


def test_the_status_lines_are_read_in_order() -> None:
    assert diskcheck_lines(CONSOLE) == [
        DiskcheckLine(511, 511, 4111, 0),
        DiskcheckLine(1023, 1023, 8817, 0),
        DiskcheckLine(1535, 1535, 13601, 1),
    ]
    assert diskcheck_lines(b"memcheck seq=1 steps=1 writes=1 passes=0 errors=0 sum=0\n") == []


def test_the_summary_names_the_range_and_the_errors() -> None:
    assert diskcheck_summary(CONSOLE) == "seq 511..1535, 9490 more records verified, 1 errors"
    assert diskcheck_summary(b"") == "no status line"
    broken = b"coloproxy-guest: disk error: no /dev/vda after 5 s\r\nKernel panic - not syncing"
    assert diskcheck_summary(broken) == (
        "no status line; disk error: no /dev/vda after 5 s; kernel: Kernel panic"
    )


def test_the_answers_parse() -> None:
    assert parse_acked(b"acked last=15 records=15\n") == (15, 15)
    assert parse_verified(b"verified records=9 ok=9 corrupt=0 first_bad=-\n") == DiskVerify(
        9, 9, 0, None
    )
    assert parse_verified(b"verified records=9 ok=7 corrupt=2 first_bad=3\n") == DiskVerify(
        9, 7, 2, 3
    )


@pytest.mark.parametrize(
    "body",
    [b"", b"diskwrite: no disk mounted at /data\n", b"acked last=x records=1", b"acked last=1"],
)
def test_a_wrong_acked_answer_is_a_lab_error(body: bytes) -> None:
    with pytest.raises(LabError, match="diskwrite answered"):
        parse_acked(body)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"verified records=9 ok=9",
        b"verified records=9 ok=8 corrupt=0 first_bad=-",  # ok + corrupt != records
        b"verified records=9 ok=8 corrupt=1 first_bad=-",  # corrupt but no first_bad
        b"verified records=9 ok=9 corrupt=0 first_bad=4",  # first_bad but nothing corrupt
    ],
)
def test_a_wrong_verified_answer_is_a_lab_error(body: bytes) -> None:
    with pytest.raises(LabError, match="diskverify answered"):
        parse_verified(body)


def test_the_cmdline_has_the_disk_words_only_with_a_disk() -> None:
    assert "coloproxy.disk" not in guest_cmdline()
    words = guest_cmdline(disk="vda", disk_rate=0, disk_console=False).split()
    assert words[-3:] == ["coloproxy.disk=vda", "coloproxy.diskrate=0", "coloproxy.diskconsole=0"]
    assert guest_cmdline(disk="vdb").split()[-3:] == [
        "coloproxy.disk=vdb",
        "coloproxy.diskrate=65536",
        "coloproxy.diskconsole=1",
    ]
    for bad in ("", "/dev/vda", "vda coloproxy.shell=1"):
        with pytest.raises(ValueError, match="block device name"):
            guest_cmdline(disk=bad)
    with pytest.raises(ValueError, match="disk_rate"):
        guest_cmdline(disk="vda", disk_rate=-1)


def test_a_record_is_magic_seq_payload_checksum() -> None:
    one = record(ACKED_MAGIC, 3)
    assert len(one) == RECORD_SIZE
    assert one[:8] == b"CPXACKD1"
    assert int.from_bytes(one[8:16], "little") == 3
    assert one != record(ACKED_MAGIC, 4)
    assert one[8:] == record(DISKCHECK_MAGIC, 3)[8:120] + one[120:]  # payload: seq only
    # The format, pinned (the same bytes as guest/cpx.c's: see the tests below).
    assert one[16:24].hex() == "23ff07f676200a04"  # payload word 0: mix(3 << 4 | 0)
    assert one[120:].hex() == "9c66c2df2856a1b0"  # FNV-1a 64 of bytes 0..119
    with pytest.raises(ValueError):
        record(b"short", 1)
    with pytest.raises(ValueError):
        record(ACKED_MAGIC, 0)


# -- cpx diskcheck on the host ------------------------------------------------------------------

START_RE = re.compile(
    r"diskcheck: start file=\S+ bytes=(\d+) capacity=(\d+) resuming after record (\d+)"
    r" verified=(\d+) errors=(\d+)"
)


@pytest.fixture(scope="module")
def cpx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    assert gcc is not None, "gcc is needed to build guest/cpx.c (scripts/setup installs it)"
    binary = tmp_path_factory.mktemp("cpx") / "cpx"
    subprocess.run(
        [gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary),
         str(repo_root() / "guest" / "cpx.c")],
        check=True,
    )  # fmt: skip
    return binary


def run_diskcheck(
    cpx: Path, path: Path, lines: int = 1, *, rate: int = 65536, cap: int = 4096
) -> str:
    """Runs the checker on ``path`` until it printed ``lines`` status lines (one a second),
    then SIGKILLs it; what it printed."""
    log = path.with_suffix(".out")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(cpx), "diskcheck", "-f", str(path), "-r", str(rate), "-c", str(cap)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while len(diskcheck_lines(log.read_bytes())) < lines:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    return log.read_text()


def records_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + RECORD_SIZE] for i in range(0, len(data), RECORD_SIZE)]


def test_diskcheck_writes_the_records_the_lab_knows(cpx: Path, tmp_path: Path) -> None:
    path = tmp_path / "dc.dat"
    out = run_diskcheck(cpx, path, 2)
    lines = diskcheck_lines(out.encode())
    assert lines, out
    assert all(line.errors == 0 for line in lines), out
    found = records_of(path)
    assert len(found) >= lines[-1].seq > 0
    assert found == [record(DISKCHECK_MAGIC, seq) for seq in range(1, len(found) + 1)]


def test_diskcheck_resumes_after_the_last_record(cpx: Path, tmp_path: Path) -> None:
    path = tmp_path / "dc.dat"
    run_diskcheck(cpx, path)
    have = len(records_of(path))
    out = run_diskcheck(cpx, path)
    start = START_RE.search(out)
    assert start is not None, out
    assert int(start[3]) == have and int(start[4]) == have and int(start[5]) == 0, out
    assert diskcheck_lines(out.encode())[0].seq > have


def test_diskcheck_finds_a_bad_record_at_start_and_counts_it_once(
    cpx: Path, tmp_path: Path
) -> None:
    path = tmp_path / "dc.dat"
    run_diskcheck(cpx, path)
    with path.open("r+b") as f:
        f.seek(9 * RECORD_SIZE + 50)  # record 10
        f.write(b"\xff")
    out = run_diskcheck(cpx, path, 2)
    start = START_RE.search(out)
    assert start is not None, out
    assert int(start[5]) == 1, out
    assert "diskcheck: error: record 10 (slot 9) missing or bad" in out
    # The rolling pass sees it again and again (several passes here) but counts it once.
    lines = diskcheck_lines(out.encode())
    assert [line.errors for line in lines] == [1, 1], out
    assert lines[-1].verified > 2 * lines[-1].records, out


def test_diskcheck_finds_a_record_gone_bad_while_it_runs(cpx: Path, tmp_path: Path) -> None:
    path = tmp_path / "dc.dat"
    proc = subprocess.Popen(
        [str(cpx), "diskcheck", "-f", str(path), "-r", "65536", "-c", "4096"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not path.exists() or path.stat().st_size < 10 * RECORD_SIZE:
            assert time.monotonic() < deadline, "the checker wrote nothing"
            time.sleep(0.05)
        with path.open("r+b") as f:
            f.seek(4 * RECORD_SIZE + 30)  # record 5
            f.write(b"\x00\x01")
        time.sleep(2.5)  # passes over the whole file take well under a second
    finally:
        proc.kill()
        out = proc.communicate(timeout=10)[0].decode()
    assert "diskcheck: error: record 5 (slot 4) bad: not a good record" in out
    assert diskcheck_lines(out.encode())[-1].errors == 1, out


def test_diskcheck_a_wrapped_ring_holds_the_newest_records(cpx: Path, tmp_path: Path) -> None:
    path = tmp_path / "dc.dat"
    out = run_diskcheck(cpx, path, 2, cap=300)
    last = diskcheck_lines(out.encode())[-1]
    assert last.seq > 300 and last.records == 300 and last.errors == 0, out
    assert path.stat().st_size == 300 * RECORD_SIZE
    out = run_diskcheck(cpx, path, cap=300)
    start = START_RE.search(out)
    assert start is not None and int(start[5]) == 0, out
    assert int(start[4]) == 300 - 64, out  # the oldest batch's slots are not counted on
    # Every slot holds the newest record of its class: the last 300, each in slot (seq-1) % 300.
    found = records_of(path)
    top = max(int.from_bytes(r[8:16], "little") for r in found)
    assert top > int(start[3])
    assert found == [record(DISKCHECK_MAGIC, top - (top - 1 - slot) % 300) for slot in range(300)]


def test_diskcheck_survives_a_longer_or_shorter_file(cpx: Path, tmp_path: Path) -> None:
    path = tmp_path / "dc.dat"
    run_diskcheck(cpx, path)
    have = len(records_of(path))
    # Longer: bytes after the last record (a batch being written when the VM died).
    with path.open("ab") as f:
        f.write(b"\xab" * 1000)
    out = run_diskcheck(cpx, path)
    start = START_RE.search(out)
    assert start is not None, out
    assert (int(start[3]), int(start[5])) == (have, 0), out
    assert f"the file is longer than expected: 1000 bytes after record {have} cut off" in out
    # Shorter: cut in the middle of a record; it goes on after the last whole one.
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size - RECORD_SIZE * 3 - 17)
    keep = (size - RECORD_SIZE * 3 - 17) // RECORD_SIZE
    out = run_diskcheck(cpx, path)
    start = START_RE.search(out)
    assert start is not None, out
    assert (int(start[3]), int(start[5])) == (keep, 0), out
    found = records_of(path)
    assert found == [record(DISKCHECK_MAGIC, seq) for seq in range(1, len(found) + 1)]


def test_diskcheck_an_unfinished_last_batch_is_written_again(cpx: Path, tmp_path: Path) -> None:
    path = tmp_path / "dc.dat"
    run_diskcheck(cpx, path)
    have = len(records_of(path))
    with path.open("r+b") as f:  # the second-to-last record never reached the disk
        f.seek((have - 2) * RECORD_SIZE)
        f.write(b"\0" * RECORD_SIZE)
    out = run_diskcheck(cpx, path)
    assert f"records {have - 1}..{have} were a batch not completely written" in out, out
    start = START_RE.search(out)
    assert start is not None and (int(start[3]), int(start[5])) == (have, 0), out
    assert records_of(path)[have - 2] == record(DISKCHECK_MAGIC, have - 1)
