"""The guest's disk is replicated: QEMU's block replication, driven by the engines
(coloproxy/engine/disk.py, docs/engine.md "The disk"), on the lab's real VM pair.

Theory of operation. ``coloproxy lab up`` gives each guest a 64 MiB raw disk (an ext4 file
system on its first 60 MiB) behind a quorum drive; host S's QEMU has the secondary's
layout (base, replication node over active and hidden qcow2 disks). The engines export host
S's base over NBD, copy host P's disk into it, add host P's replication child and enter
COLO. The tests write known 64 KiB blocks into the last 4 MiB (outside the file system, so
the guest's own writes never touch them) with HMP ``qemu-io`` on host P's quorum drive and
read the guest's view on the other host the same way (``Lab.qemu_io``):

- before a checkpoint the SVM still sees the old contents (the replication driver keeps
  them in the hidden disk), after it the new ones: the primary's writes reach the
  secondary's view at every checkpoint;
- after SIGKILL of the primary, the survivor's disk holds every block written before the
  last checkpoint, and a block written after it is rolled back with the rest of the guest
  (the state the SVM resumes from);
- reprotect (host S primary, host P a new secondary whose stale disk host S's engine brings
  up to date first), failover of the secondary (host S's guest writes on, alone), reprotect
  again and a second failover (host P takes over): the same at each step.

The guest writes its disk too: before each kill the client has the guest append records
(``/cgi-bin/diskwrite``, answered once they are synced; then a checkpoint, which discards
the SVM's own copies of them, then more records), and after each failover the survivor's
guest reads every one back (``/cgi-bin/diskverify``): all there, none corrupt. The guest's
own disk checker (a ring of records it reads back continuously) reports no error on either
console.

One lab carries the whole story (TCG is slow); each step says what it checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coloproxy.config import parse_config
from coloproxy.engine.disk import REPLICATION_NODE, DiskReplication, DiskSettings, drive_argv
from coloproxy.lab import configs, diskcheck, vms
from coloproxy.lab.demo import QUIET_PERIOD_MS
from coloproxy.lab.lab import Lab
from coloproxy.lab.qemu import repo_root
from coloproxy.lab.topology import GUEST_IPV4
from coloproxy.lab.vms import LabError, Monitor
from coloproxy.net import netns
from coloproxy.protocol import CheckpointNow

_counter = itertools.count()
BLOCK = 64 << 10
# The last 4 MiB of the 64 MiB disk: outside the guest's file system (vms.make_disk).
PROBE = 60 << 20
FAILED = "Pattern verification failed"


# -- the configs and command lines (no root) ------------------------------------------------


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_the_lab_configs_name_the_disks_the_lab_qemus_open(role: str, tmp_path: Path) -> None:
    paths = configs.LabPaths(tmp_path)
    config = parse_config(configs.config_text(role, paths))
    assert DiskSettings.from_config(config) == vms.disk_settings(paths, role)
    # after a reprotect host P is the secondary, with its own files and address
    host_p = parse_config(configs.reprotect_config_text(paths))
    assert DiskSettings.from_config(host_p) == vms.disk_settings(paths, "primary")
    # without a disk: no section
    assert parse_config(configs.config_text(role, paths, disk=False)).disk is None


def _drives(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == "-drive"]


def test_the_drive_layouts_are_qemus_colo_ones() -> None:
    settings = vms.disk_settings(configs.LabPaths(Path("/run/x")), "secondary")
    primary = _drives(drive_argv(settings, "primary"))
    assert primary == [
        "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,"
        "children.0.driver=raw,children.0.file.filename=/run/x/secondary-disk.img"
    ]
    base, replication, quorum = _drives(drive_argv(settings, "secondary"))
    assert base == "if=none,id=parent0,driver=raw,file.filename=/run/x/secondary-disk.img"
    assert "driver=replication,mode=secondary,top-id=colo-disk0," in replication
    assert "file.file.filename=/run/x/secondary-disk-active.qcow2" in replication
    assert "file.backing.file.filename=/run/x/secondary-disk-hidden.qcow2" in replication
    assert replication.endswith("file.backing.backing=parent0")
    assert quorum.endswith("vote-threshold=1,children.0=colo-childs0")
    # the guest sees the same device on both sides (the migration needs it)
    assert drive_argv(settings, "primary")[-2:] == drive_argv(settings, "secondary")[-2:]
    spec = vms.VmSpec(
        "secondary", Path("/q"), Path("/fw"), Path("/k"), Path("/i"), "tcg",
        configs.LabPaths(Path("/run/x")), configs.migrate_uri(), disk=settings,
    )  # fmt: skip
    assert _drives(vms.qemu_argv(spec)) == [base, replication, quorum]
    with pytest.raises(ValueError):
        drive_argv(settings, "witness")


@pytest.mark.root
def test_a_hung_link_is_cut_until_the_child_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    """detach_lost on a link that hangs: a peer that accepts and never answers (as an NBD
    export behind dropped packets); the stand-in for QEMU's child removal waits on the
    connection, as QEMU's drain does. After the grace the connection is destroyed
    (``ss -K``), the wait ends with an error, the removal completes."""
    if os.geteuid() != 0:
        pytest.skip("needs root: sock_destroy")

    async def scenario() -> tuple[float, BaseException | None]:
        server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        settings = DiskSettings("i", "a", "h", "raw", "127.0.0.1", "127.0.0.1", nbd_port=port)
        disk = DiskReplication(None, settings)  # type: ignore[arg-type]
        seen: list[BaseException | None] = [None]

        async def detach() -> None:  # QEMU's drain: waits for the NBD server's reply
            try:
                await reader.read(1)
            except OSError as exc:
                seen[0] = exc

        monkeypatch.setattr(disk, "detach", detach)
        started = time.monotonic()
        async with asyncio.timeout(10):
            await disk.detach_lost(grace=0.3, every=0.1)
        took = time.monotonic() - started
        writer.close()
        server.close()
        return took, seen[0]

    took, error = asyncio.run(scenario())
    assert 0.3 <= took < 3, took
    assert isinstance(error, ConnectionError) or (
        isinstance(error, OSError) and error.errno == errno.ECONNABORTED
    ), error


# -- the real pair --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, QEMU, NFQUEUE; builds with apt")
    if not Path("/proc/sys/net/bridge").is_dir():
        pytest.skip("kernel without br_netfilter (/proc/sys/net/bridge is missing)")
    for script in ("qemu/build.sh", "guest/build.sh"):
        subprocess.run([str(repo_root() / script)], check=True, stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def _lab(run_dir: Path, disk_dir: Path | None = None) -> Iterator[Lab]:
    prefix = f"cpd{os.getpid() % 10000}{next(_counter)}"
    lab = Lab(prefix, run_dir, disk_dir=disk_dir, say=lambda _text: None)
    try:
        lab.up(build=False)
        yield lab
    finally:
        lab.down()
        left = [name for name in lab.topology.namespaces() if netns.exists(name)]
        assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def disk_lab(built: None, tmp_path: Path) -> Iterator[Lab]:
    with _lab(tmp_path / "run") as lab:
        yield lab


# Host S's active and hidden disks on a file system this small: two empty 64 MiB qcow2
# files take 384 KiB, a checkpoint period of the guest's own writes a few hundred more;
# the test's 4 MiB over written data cannot fit.
SMALL_FS = "2m"


@pytest.fixture
def small_disk_lab(built: None, tmp_path: Path) -> Iterator[Lab]:
    """A lab whose host S keeps its active and hidden disks on a 2 MiB tmpfs (mounted
    before the QEMUs start: their mount namespaces inherit it)."""
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS}", "coloproxy-test", str(overlays)]
    subprocess.run(mount, check=True)
    try:
        with _lab(tmp_path / "run", disk_dir=overlays) as lab:
            yield lab
    finally:
        subprocess.run(["umount", str(overlays)], check=True)


class Blocks:
    """The blocks written so far: offset -> pattern byte, and where each was written."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.kept: dict[int, int] = {}
        self._next = itertools.count()

    def write(self, role: str) -> tuple[int, int]:
        """One new block through ``role``'s QEMU (the current primary): (offset, pattern)."""
        index = next(self._next)
        offset, pattern = PROBE + index * BLOCK, 0x11 + index
        out = self.lab.qemu_io(role, f"write -P {pattern:#x} {offset} {BLOCK}")
        assert f"wrote {BLOCK}/{BLOCK} bytes at offset {offset}" in out, out
        return offset, pattern

    def read(self, role: str, offset: int, pattern: int) -> bool:
        out = self.lab.qemu_io(role, f"read -P {pattern:#x} {offset} {BLOCK}")
        assert f"read {BLOCK}/{BLOCK} bytes at offset {offset}" in out, out
        return FAILED not in out

    def check_all(self, role: str, what: str) -> None:
        bad = [hex(o) for o, p in self.kept.items() if not self.read(role, o, p)]
        assert not bad, f"{what}: blocks not as written on {role}'s QEMU: {bad}"

    def replicated_at_checkpoints(self, primary: str, secondary: str, rounds: int = 3) -> None:
        """Each block: not in the SVM's view before the checkpoint, in it after."""
        for _ in range(rounds):
            offset, pattern = self.write(primary)
            assert self.read(secondary, offset, 0), "the SVM saw a write before a checkpoint"
            self.lab.checkpoint_now(primary)
            assert self.read(secondary, offset, pattern), "a checkpoint did not bring a write"
            self.kept[offset] = pattern
        self.check_all(secondary, "after the checkpoints")

    def rolled_back_on(self, survivor: str, offset: int) -> None:
        assert self.read(survivor, offset, 0), (
            "a block written after the last checkpoint survived the takeover: the disk is"
            " ahead of the guest's memory"
        )


class Records:
    """The guest's own writes: records the client saw acknowledged (/cgi-bin/diskwrite
    answers once they are synced), read back by the guest after each failover."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.acked = 0

    def write(self, role: str, requests: int = 3, n: int = 20, checkpoint: bool = True) -> None:
        """Records, a checkpoint, more records. The PVM and the SVM both write each record
        (the SVM gets the same requests); the answers match, so the proxy releases them
        without a checkpoint. Only a checkpoint discards the SVM's own writes (its active
        disk is emptied): from then on the records are on the secondary only through the
        primary's replication child. Without the child the records written before the
        checkpoint come back corrupt after a takeover (seen: 56 of 80)."""
        client = self.lab.topology.ns("client")
        for index in range(requests + 1):
            if index == requests and checkpoint:
                self.lab.checkpoint_now(role)
            last = diskcheck.disk_write(GUEST_IPV4, n, netns=client, timeout=20)
            assert last >= self.acked + n, (last, self.acked)
            self.acked = last

    def verify(self, what: str) -> diskcheck.DiskVerify:
        check = diskcheck.disk_verify(GUEST_IPV4, netns=self.lab.topology.ns("client"), timeout=20)
        assert check.corrupt == 0, f"{what}: {check}"
        assert check.records >= self.acked, f"{what}: {self.acked} acknowledged, {check}"
        return check


def _checker_errors(lab: Lab, role: str, timeout: float = 20.0) -> int:
    """The most errors any of the guest's disk checker lines on ``role``'s console reports.
    A QEMU started by a reprotect has a console of its own: the migrated guest's checker
    prints its first line there within a status interval, seconds under TCG on a busy
    machine (a CI run with a lab benchmark beside it read the console before it had)."""
    deadline = time.monotonic() + timeout
    while not (lines := diskcheck.diskcheck_lines(vms.console(lab.paths, role))):
        assert time.monotonic() < deadline, f"no disk checker line on {role}'s console"
        time.sleep(0.2)
    return max(line.errors for line in lines)


def _wait_alone(lab: Lab, role: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = lab.colo_status(role)
        if status["mode"] == "none" and status["last-mode"] in ("primary", "secondary"):
            return
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


@pytest.mark.qemu
@pytest.mark.root
def test_disk_replication_through_failovers_and_reprotects(
    disk_lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = disk_lab
    blocks = Blocks(lab)
    records = Records(lab)
    figures: list[str] = []
    # host P primary, host S secondary: writes reach S's view at each checkpoint
    lab.set_period(QUIET_PERIOD_MS)
    blocks.replicated_at_checkpoints("primary", "secondary")
    records.write("primary")
    # a block after the last checkpoint, then SIGKILL of the primary: host S takes over
    late, _ = blocks.write("primary")
    lab.kill_qemu("primary")
    _wait_alone(lab, "secondary")
    lab.wait_serving(30)
    blocks.check_all("secondary", "after the primary's SIGKILL")
    blocks.rolled_back_on("secondary", late)
    check = records.verify("after the primary's SIGKILL")
    figures.append(f"{check.records} records read back after the first takeover")
    # host S's guest writes alone; its disk is the truth now
    offset, pattern = blocks.write("secondary")
    blocks.kept[offset] = pattern

    # reprotect: host P a new secondary, its stale disk brought up to date by host S
    took = lab.reprotect()
    figures.append(f"reprotect {took:.1f} s")
    lab.set_period(QUIET_PERIOD_MS, role="secondary")
    blocks.check_all("primary", "on the new secondary after the reprotect's copy")
    blocks.replicated_at_checkpoints("secondary", "primary")
    records.write("secondary")

    # failover of the secondary: host S leaves COLO and writes on alone
    lab.kill_qemu("primary")
    _wait_alone(lab, "secondary")
    started = time.monotonic()
    offset, pattern = blocks.write("secondary")  # no replication child to wait for
    figures.append(f"write after the secondary's loss {time.monotonic() - started:.2f} s")
    blocks.kept[offset] = pattern
    blocks.check_all("secondary", "after the secondary's SIGKILL")
    lab.wait_serving(30)
    records.verify("after the secondary's SIGKILL")
    records.write("secondary", requests=1, checkpoint=False)  # alone: no checkpoints

    # reprotect again, then the second takeover: host P takes over from host S
    took = lab.reprotect()
    figures.append(f"second reprotect {took:.1f} s")
    lab.set_period(QUIET_PERIOD_MS, role="secondary")
    blocks.check_all("primary", "on the new secondary after the second reprotect")
    blocks.replicated_at_checkpoints("secondary", "primary", rounds=2)
    records.write("secondary")
    late, _ = blocks.write("secondary")
    lab.kill_qemu("secondary")
    _wait_alone(lab, "primary")
    lab.wait_serving(30)
    blocks.check_all("primary", "after host S's SIGKILL")
    blocks.rolled_back_on("primary", late)
    check = records.verify("after the second takeover")
    figures.append(f"{check.records} records read back after the second takeover")
    # the guest's own checker (ring of records, read back continuously): no error anywhere
    assert _checker_errors(lab, "primary") == 0
    assert _checker_errors(lab, "secondary") == 0
    with capsys.disabled():
        print(f"\n[disk] {len(blocks.kept)} blocks checked; " + ", ".join(figures))


@pytest.mark.qemu
@pytest.mark.root
def test_the_nbd_link_lost_the_primary_leaves_colo(
    disk_lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    """Host S's NBD export goes away while in COLO (its server stopped: the connection
    resets, as when the link or the server breaks). The primary's replication node records
    the failed writes and QEMU 7.2 would go on checkpointing with a secondary whose disk
    misses them (seen, qemu/patches/7.2/0004); with the patch the next checkpoint fails,
    the primary leaves COLO and serves alone, its records intact. Host S does not take
    over: its disk is behind."""
    lab = disk_lab
    records = Records(lab)
    records.write("primary")
    asyncio.run(_qmp(lab, "secondary", "nbd-server-stop"))
    cut = time.monotonic()
    records.write("primary", requests=1, checkpoint=False)  # the guest writes on
    lab._command("primary", CheckpointNow(reason="manual"), "checkpoint")  # it fails
    _wait_alone(lab, "primary")
    left = time.monotonic() - cut
    lab.wait_serving(30)
    records.verify("on the primary alone")
    # host S stays out of service: stopped in the checkpoint that failed, never running
    assert asyncio.run(_qmp(lab, "secondary", "query-status"))["status"] != "running"
    log = lab.paths.daemon_log("primary").read_text(errors="replace")
    assert "secondary lost (colo-exit" in log, log[-2000:]
    qemu_log = lab.paths.qemu_log("primary").read_text(errors="replace")
    assert "disk replication failed" in qemu_log, qemu_log[-2000:]
    with capsys.disabled():
        print(f"\n[disk] NBD export gone: the primary left COLO {left:.1f} s later")


async def _qmp(lab: Lab, role: str, command: str) -> Any:
    """One QMP command on ``role``'s lab monitor; its answer."""
    monitor = await Monitor(role, lab.paths.lab_qmp_socket(role)).connect()
    try:
        return await monitor.execute(command)
    finally:
        await monitor.close()


FILL = 4 << 20  # the last 4 MiB of the disk (PROBE on), outside the guest's file system


@pytest.mark.qemu
@pytest.mark.root
def test_the_secondary_disk_full_the_primary_leaves_colo(
    small_disk_lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    """Host S's active and hidden disks live on a 2 MiB tmpfs. The primary writes 4 MiB,
    a checkpoint, then 4 MiB over them: the secondary's replication driver must save the
    base's old contents into the hidden disk before each write lands, the tmpfs fills, the
    write fails on the secondary and the primary's NBD client gets the error. The pair
    cannot replicate any more: the primary leaves COLO and serves alone, its disk intact
    (every record the client saw acknowledged reads back), host S never serves, the
    logs say why."""
    lab = small_disk_lab
    records = Records(lab)
    records.write("primary")  # acknowledged: replicated at a checkpoint
    cut = time.monotonic()
    # 4 MiB into the base, a checkpoint (the hidden disk emptied): they are the base's now
    out = lab.qemu_io("primary", f"write -P 0x5a {PROBE} {FILL}")
    assert f"wrote {FILL}/{FILL} bytes" in out, out
    with contextlib.suppress(LabError):  # the guest's own writes may have filled it already
        lab.checkpoint_now("primary")
    # 4 MiB over them: the secondary must keep the old 4 MiB in its hidden disk first
    out = lab.qemu_io("primary", f"write -P 0xa5 {PROBE} {FILL}")
    # the primary's own disk takes the write: the quorum needs one child
    assert f"wrote {FILL}/{FILL} bytes" in out, out
    with contextlib.suppress(LabError):  # it fails: that is the point
        lab._command("primary", CheckpointNow(reason="manual"), "checkpoint")
    _wait_alone(lab, "primary", timeout=60)
    left = time.monotonic() - cut
    lab.wait_serving(30)
    # the primary serves alone, its disk intact: the records, and the 4 MiB as written last
    records.write("primary", requests=1, checkpoint=False)
    check = records.verify("on the primary alone")
    out = lab.qemu_io("primary", f"read -P 0xa5 {PROBE} {FILL}")
    assert FAILED not in out and f"read {FILL}/{FILL} bytes" in out, out
    assert _checker_errors(lab, "primary") == 0
    # host S never runs the guest: its disk is behind (both serving would split the brain).
    # Its QEMU is stopped, or gone: QEMU 7.2 aborts a secondary whose guest stopped on the
    # full disk at its next checkpoint ("invalid runstate transition: 'io-error' -> 'colo'").
    state = lab._require_state()
    if vms.alive(state.pids["secondary_qemu"]):
        assert asyncio.run(_qmp(lab, "secondary", "query-status"))["status"] != "running"
    log = lab.paths.daemon_log("primary").read_text(errors="replace")
    # Host P learns it from its own QEMU (COLO_EXIT) or from host S's heartbeat saying its
    # QEMU exited (the abort above), whichever comes first: a CI run saw the heartbeat win.
    assert re.search(r"secondary lost \((colo-exit|qemu-exited)", log), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    secondary_log = lab.paths.daemon_log("secondary").read_text(errors="replace")
    assert "Traceback" not in secondary_log, secondary_log[-3000:]
    assert "taking over" not in secondary_log, secondary_log[-3000:]
    # the cause, in so many words: host S's engine saw its guest's write fail for lack of
    # space, or (the SVM not writing) the primary's checkpoint failed on the replication error
    qemu_log = lab.paths.qemu_log("primary").read_text(errors="replace")
    full = "the file system under it is full (a secondary's active and hidden disks"
    assert full in secondary_log or "disk replication failed" in qemu_log, (
        secondary_log[-3000:] + qemu_log[-1000:]
    )
    with capsys.disabled():
        print(
            f"\n[disk] host S's disk full: the primary left COLO {left:.1f} s after the"
            f" writes began; {check.records} records read back on the primary"
        )


def _colo_mode(lab: Lab, role: str, timeout: float = 2.0) -> str | None:
    """``role``'s QEMU's COLO mode, None when its monitor does not answer in ``timeout`` (its
    main loop blocked)."""

    async def ask() -> str:
        monitor = await Monitor(role, lab.paths.lab_qmp_socket(role)).connect()
        try:
            return str((await monitor.execute("query-colo-status"))["mode"])
        finally:
            await monitor.close()

    try:
        return asyncio.run(asyncio.wait_for(ask(), timeout))
    except TimeoutError:
        return None


def _drop_nbd(lab: Lab) -> None:
    """Host S's NBD export stops answering, without a reset: its packets are dropped (in
    host S's namespace only), as on a link that hangs."""
    port = str(configs.NBD_PORT)
    for chain, side in (("INPUT", "--dport"), ("OUTPUT", "--sport")):
        rule = ["iptables", "-w", "-A", chain, "-p", "tcp", side, port, "-j", "DROP"]
        subprocess.run(["ip", "netns", "exec", lab.topology.ns("hs"), *rule], check=True)


@pytest.mark.qemu
@pytest.mark.root
def test_a_hung_nbd_link_the_primary_leaves_colo(
    disk_lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    """Host S's NBD export hangs (packets dropped, no reset) while the guest writes. QEMU
    7.2's NBD client has no I/O timeout: the guest's write waits for the replication child,
    the next checkpoint's stop waits for it (the block layer drains), and so does the
    primary QEMU's main loop, its monitor included, until TCP gives up (about 15 minutes).
    The engine sees the checkpoint stall (engine.checkpoint_timeout_ms), and, QEMU not
    answering, cuts the NBD connections (the kernel's sock_destroy): the block layer gets
    its error, QEMU answers again, the child is removed, the primary leaves COLO and serves
    alone, its records intact. The client's write answered only once the primary left COLO;
    host S never serves."""
    lab = disk_lab
    records = Records(lab)
    lab.set_period(QUIET_PERIOD_MS)
    records.write("primary")
    _drop_nbd(lab)
    cut = time.monotonic()
    answered: list[tuple[float, int | Exception]] = []

    def write() -> None:
        client = lab.topology.ns("client")
        try:
            last: int | Exception = diskcheck.disk_write(GUEST_IPV4, 20, netns=client, timeout=90)
        except LabError as exc:
            last = exc
        answered.append((time.monotonic(), last))

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    left_at = None
    seen_hung = False
    deadline = cut + 60
    while time.monotonic() < deadline:
        mode = _colo_mode(lab, "primary")
        seen_hung = seen_hung or mode is None
        if mode == "none":
            left_at = time.monotonic()
            break
        # nothing reaches the client while the primary is still in COLO
        assert not answered or isinstance(answered[0][1], Exception), answered
        time.sleep(0.5)
    assert left_at is not None, (
        "the primary is still in COLO (or its QEMU hangs) 60 s after the NBD link hung; "
        + lab.paths.daemon_log("primary").read_text(errors="replace")[-3000:]
    )
    lab.wait_serving(30)
    writer.join(95)
    assert answered, "the client's write never got an answer"
    when, last = answered[0]
    if isinstance(last, int):  # answered: by the primary alone, after COLO
        assert when >= left_at - 1.0, (when - cut, left_at - cut)
        records.acked = max(records.acked, last)
    # the guest writes on, alone, and reads every acknowledged record back
    records.write("primary", requests=1, checkpoint=False)
    check = records.verify("on the primary alone")
    assert _checker_errors(lab, "primary") == 0
    assert asyncio.run(_qmp(lab, "secondary", "query-status"))["status"] != "running"
    log = lab.paths.daemon_log("primary").read_text(errors="replace")
    assert "secondary lost (" in log, log[-3000:]
    assert "NBD link" in log and "hung" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    nodes = asyncio.run(_qmp(lab, "primary", "query-named-block-nodes"))
    assert REPLICATION_NODE not in {node.get("node-name") for node in nodes}, nodes
    with capsys.disabled():
        print(
            f"\n[disk] NBD link hung (QEMU's monitor blocked: {seen_hung}): the primary left"
            f" COLO {left_at - cut:.1f} s later; the write in flight answered"
            f" {when - cut:.1f} s after the hang ({last!r}); {check.records} records read back"
        )
